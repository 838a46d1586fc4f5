"""Models (one family per file) and the one training loop that reports to Ray Tune."""
