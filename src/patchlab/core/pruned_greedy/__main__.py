"""`python -m patchlab.core.pruned_greedy`: compile the selection into numba's cache."""

from patchlab.core.pruned_greedy import warm_up

warm_up()
