"""backchat: a private AI workstation for Backstage's Backchat plugin, as a pyinfra deploy.

    from backchat import deploy_backchat
    from backchat import rollback_backchat, status_backchat, uninstall_backchat  # day two

Imported lazily, so ``python -m backchat.hub`` (a child process of the deploy) does not
load pyinfra.
"""

__all__ = ["deploy_backchat", "rollback_backchat", "status_backchat", "uninstall_backchat"]


def __getattr__(name: str):
    if name == "deploy_backchat":
        from backchat.deploy import deploy_backchat

        return deploy_backchat
    if name == "status_backchat":
        from backchat.status import status_backchat

        return status_backchat
    if name == "rollback_backchat":
        from backchat.rollback import rollback_backchat

        return rollback_backchat
    if name == "uninstall_backchat":
        from backchat.uninstall import uninstall_backchat

        return uninstall_backchat
    raise AttributeError(f"module 'backchat' has no attribute {name!r}")
