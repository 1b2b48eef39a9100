"""Sample model served by minipool workers: squares its inputs."""


def predict(list_items):
    """Returns the square of the items"""
    return [i * i for i in list_items]
