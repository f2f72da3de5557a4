"""``steerserve vectors``: import and export of artifacts between formats and stores."""
