"""Models: loading a chat model as one handle (architecture facts, the tokenizer), the embedded offline models and
their conversion, and memory estimates. Imports only :mod:`introspection_utils.core`."""
