"""backchat: a private AI workstation for Backstage's Backchat plugin, as a pyinfra deploy.

    from backchat import deploy_backchat

Imported lazily, so ``python -m backchat.hub`` (a child process of the deploy) does not
load pyinfra.
"""

__all__ = ["deploy_backchat"]


def __getattr__(name: str):
    if name == "deploy_backchat":
        from backchat.deploy import deploy_backchat

        return deploy_backchat
    raise AttributeError(f"module 'backchat' has no attribute {name!r}")
