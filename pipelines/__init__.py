"""Command-line tools: the user CLIs (run as scripts) and the benchmarks (run as modules from the repository root)."""
