"""Features: patch encoders (ResNet-18 SimCLR, UNI, foundation models), extraction into feature stores, SimCLR pretraining."""
