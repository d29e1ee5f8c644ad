"""What the notebooks show and poke at: profiles, widgets, figures, recorded views, attention maps, the collapse study.

Built on the core (:mod:`dino_nb.model`, :mod:`dino_nb.evaluation`, ...); nothing in the core
imports it, so training runs without matplotlib's figures or ipywidgets' sliders.
"""
