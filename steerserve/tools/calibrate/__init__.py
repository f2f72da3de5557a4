"""``steerserve calibrate``: the KL-bounded strength of a one-layer vector (``kl_bound`` holds the maths)."""
