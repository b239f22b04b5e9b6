"""What people read: rich tables and JSON, plots, progress bars, and docs/config.md generated from
the config's declarations."""
