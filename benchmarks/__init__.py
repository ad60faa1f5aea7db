"""The benchmark suite (installed as resflow_cuda.benchmarks; run with `resflow-bench`)."""
