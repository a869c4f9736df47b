"""The demo: the embedded broker (amqtt, ``demo`` extra), subscriber and `appliance demo`."""
