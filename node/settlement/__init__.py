"""Epochs, the money split, Merkle trees and the Celery tasks that settle on chain."""
