"""The part that runs inside the forward pass: a vector bank, per-token tables and one op per layer."""
