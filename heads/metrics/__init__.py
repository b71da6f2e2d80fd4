"""Metrics: official VQA accuracy and COCO caption metrics (BLEU, ROUGE-L, CIDEr-D, optional
METEOR/SPICE through Java)."""
