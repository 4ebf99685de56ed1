"""The server's routes, one router per page family: the store's lists (`store_api`), concepts and
text lookup (`concept_api`), labelling runs (`runs_api`), explain (`explain_api`) and steering
(`steer_api`). Each route calls one engine function with the store from `engine.serve.deps`."""

from __future__ import annotations

from engine.serve.routes import concept_api, explain_api, runs_api, steer_api, store_api

# in the order the app includes them (the order of the OpenAPI paths)
ROUTERS = [store_api.router, concept_api.router, runs_api.router, explain_api.router, steer_api.router]

__all__ = ["ROUTERS"]
