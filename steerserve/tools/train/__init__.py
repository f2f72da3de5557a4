"""``steerserve train KIND``: refusal controllers and SafeSwitch probes + head, each with its command (``cli``)."""
