"""``steerserve extract KIND``: one module per recipe (mean-diff, EAST, ASC, refusal direction, fTRI) and the
command registry (``cli``)."""
