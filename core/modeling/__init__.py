"""Modeling: the RecBole adapter, dataset build, training, batch finder, evaluation, export, champion re-scoring."""
