"""The operator's side of a running deployment: enrol devices with the broker, drive and describe rounds."""
