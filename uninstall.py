"""Take backchat off each host: its containers and volumes, its files, Backstage's config
back as it was. Docker stays, and so does the model unless --data remove_model=true.

    pyinfra inventory.py uninstall.py
"""

from backchat import uninstall_backchat

uninstall_backchat()
