"""The demo: embedded broker, subscriber and the `appliance demo` orchestration."""
