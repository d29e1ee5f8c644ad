"""What a user runs around training, built on the core (which never imports it).

Find or download ImageNette, evaluate a checkpoint, embed and search a folder of photos, load
the paper's weights, estimate a recipe's memory and time.
"""
