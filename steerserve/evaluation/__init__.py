"""``steerserve eval``: the method-effect harness (generate with and without a spec, measure, report)."""
