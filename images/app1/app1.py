"""Sample model served by minipool workers: doubles its inputs."""


def predict(list_items):
    """Returns the double of the items"""
    return [i * 2 for i in list_items]
