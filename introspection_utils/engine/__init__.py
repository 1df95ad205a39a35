"""Engine: chat-formatted prompts, concept and random vectors, the injection pass (trials → yes−no readouts, the
logit lens, attention), component edits, generation under injection, and where a sweep's units run (executors)."""
