"""One module per benchmark suite; each defines ``SUITE = fastdl.bench.Suite(...)`` and is found by
:mod:`fastdl.bench.registry` without being listed anywhere else."""
