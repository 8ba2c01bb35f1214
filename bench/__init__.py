"""`make bench`: the naive baseline, the engine in-process and the service over HTTP, in one run."""
