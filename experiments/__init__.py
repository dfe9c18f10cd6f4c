"""The experiments: each a script (run as `python -m experiments.NAME`, or by `make`) and a folder
holding its write-up (README.md), results and figures."""
