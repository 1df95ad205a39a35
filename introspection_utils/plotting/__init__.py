"""Plotting: the series' figures (one palette, labelled axes, titles naming model, concept and layer); draws what it is
given. (Named so as not to clash with the repository's ``figures/`` folder, where the PNGs are written.)"""
