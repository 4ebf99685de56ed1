"""Work past one process: Ray as an executor option of the library (docs/design.md §9).

Ray is not a second implementation of anything. The library's own functions compute a shard's
result (the alignment statistics of a slice of the corpus, the label rows of a range of features);
`engine.distributed.ray_exec` only runs them on Ray workers, with task retries, and hands their
results back to the driver in submission order. What merges or commits those results stays in
the library: statistics merge exactly (they are sums), and label rows are committed by the driver
through the run's guarded batch commit, so a retried shard never writes a row twice.
"""

from engine.distributed.ray_exec import RayConfig, StoreLocation, cluster_cpus, map_ordered, ray_session

__all__ = ["RayConfig", "StoreLocation", "cluster_cpus", "map_ordered", "ray_session"]
