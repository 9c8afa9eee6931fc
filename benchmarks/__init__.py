"""vggjax benchmarks: run each as `python -m benchmarks.<script>` from the repository root (README.md)."""
