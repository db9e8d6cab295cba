from ctrlab.cli import entry

entry()
