"""What runs on each host, checked against the settings; changes nothing.

    pyinfra inventory.py status.py

Exits non-zero when any host is unhealthy (or unreachable); report_path also writes JSON.
"""

from backchat import status_backchat

status_backchat()
