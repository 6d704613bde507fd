"""Stage modules of the ShaPO reproduction workflow; each is runnable as ``python -m workflow.<stage>``."""
