"""Readings: the computed sentences a notebook prints under its figure — words for numbers computed elsewhere
(``sentences``), and the same sentences recomputed from a run's saved tables for the findings (``saved``)."""
