"""`atlas serve`: the HTTP API and web explorer over a store (docs/design.md §11).

A layer beside the CLI: `engine.serve.app` builds a FastAPI app whose routes call the same engine
functions as the CLI (lookup, the store's concepts / neighbours / atlases / maps / runs, run pages
and exports, explain, steering plans) and return their plain data as JSON; `engine.serve.static`
is the page (hand-written HTML, CSS and JS, no build step, no CDN) served by the same process.
Nothing in the core imports this package. FastAPI and uvicorn are the optional ``serve`` extra.
"""
