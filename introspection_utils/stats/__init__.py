"""Statistics: pure table code — every definition a reading, a figure or the atlas quotes (Δ, I, S, flips, the
verdict classes and their test) and the calibration of that test on synthetic sweeps. No model is touched here."""
