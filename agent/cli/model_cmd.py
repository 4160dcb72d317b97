"""Placeholder until this command group lands; replaced by its owner."""


def register(sub):
    pass
