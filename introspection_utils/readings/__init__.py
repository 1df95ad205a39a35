"""Readings: the computed sentences a notebook prints under its figure — words for numbers computed elsewhere."""
