"""What compare.py is built from: the variants it runs (variants.py), the statistics over seeds (stats.py) and the
report it writes (report.py)."""
