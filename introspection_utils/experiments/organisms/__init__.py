"""Model organisms with a truth known by construction (notebook 14): the training split (:mod:`.splits`), the
training step (:mod:`.forward`), the loop and cache (:mod:`.training`) and the blind evaluation (:mod:`.evaluation`)."""
