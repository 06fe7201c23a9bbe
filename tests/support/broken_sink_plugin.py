"""A plugin that fails to import, as a broken third-party plugin would."""

raise ImportError("No module named 'vendor_sdk_that_is_missing'")
