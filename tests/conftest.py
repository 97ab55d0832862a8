import os

# Tests run on 2 cores; several processes each taking every core thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")
