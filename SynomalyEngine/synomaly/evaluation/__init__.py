"""Evaluation: metrics, labelled cases, our detection beside the intensity baseline, phantoms with known lesions."""
