"""Observability: the metrics the verbs of `amavisd.metrics` feed, and what
the master serves from them.

- `instruments.py`: the metrics (Prometheus names, units, bounded labels);
  imported only once `metrics.setup()` chose the multiprocess storage.
- `store.py`: the metrics dir: made private and wiped at start, each dead
  worker's files folded into one archive so a scrape stays cheap however
  many workers were recycled.
- `slots.py`: each worker's line on the status board (busy on which message,
  since when, requests served), a small file the master reads.
- `collect.py`: what a scrape returns: the merged files, the top virus
  names, and what only the master knows (its workers, build, uptime).
- `health.py`, `status.py`: `/healthz` and `/status` (`amavisd status`).
- `server.py`: the master's HTTP listener, a thread beside its loop.
- `exporter.py`: the few calls the master and `amavisd run` make.

This package's `__init__` imports nothing: the settings table reaches
`observe.address` without loading the rest.
"""
