"""The appliance's small error taxonomy. Never ``return None`` on failure: raise one of these."""


class ApplianceError(Exception):
    """Base class for errors the appliance reports to a person."""


class ConfigError(ApplianceError):
    """The configuration is invalid. The message names the file, the key path and the value."""


class ModelError(ApplianceError):
    """A model file, manifest or golden vector set is missing, corrupt or inconsistent."""
