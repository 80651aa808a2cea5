"""Everything drawn or written for people: per-image and per-run figures, sweep summaries, the
HTML / markdown report."""
