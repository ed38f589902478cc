from __future__ import annotations

from shared.core.queue import PREDICT_QUEUE, PREDICT_TASK, TRAIN_QUEUE, make_celery
from shared.core.settings import Settings


def test_embedded_broker_writes_whole_message_files_in_arrival_order(tmp_path) -> None:
    app = make_celery(Settings(home=tmp_path))
    for index in range(3):
        app.send_task(PREDICT_TASK, args=[[f"job-{index}"]], queue=PREDICT_QUEUE)
    spool = tmp_path / "broker" / "queue"
    names = sorted(path.name for path in spool.iterdir())
    assert len(names) == 3 and all(name.endswith(".predict.msg") for name in names)  # no '.part' left behind
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(PREDICT_QUEUE)
        bodies = [queue.get(timeout=1) for _ in range(3)]
        queue.close()
    job_ids = [message.payload[0][0][0] for message in bodies]  # body: [args, kwargs, embed]; args[0]: ids
    assert job_ids == ["job-0", "job-1", "job-2"]


def test_predictions_never_land_on_the_train_queue(tmp_path) -> None:
    app = make_celery(Settings(home=tmp_path))
    app.send_task(PREDICT_TASK, args=[["job"]], queue=PREDICT_QUEUE)
    with app.connection_for_read() as connection:
        train = connection.SimpleQueue(TRAIN_QUEUE)
        assert train.qsize() == 0
        train.close()
