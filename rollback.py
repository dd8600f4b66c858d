"""Put each AI host back on its last verified state: the files its stack read when it last
passed verify, its containers recreated on them, then verified again.

    pyinfra inventory.py rollback.py
"""

from backchat import rollback_backchat

rollback_backchat()
