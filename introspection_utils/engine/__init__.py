"""Engine: chat-formatted prompts, concept and random vectors, trials and the window rule, the one injection pass
(:mod:`injection`: the only trace that injects or ablates, with the prefix cache and the layer skip), the answer-set
readout, the measurement engine (:mod:`inject`: trials → yes−no readouts, the logit lens, attention), component
edits, generation under injection, and where a sweep's units run (executors)."""
