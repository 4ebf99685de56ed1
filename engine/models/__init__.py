"""Models: loading (from a folder or hub id), the residual-stream hook, and batched activation collection."""
