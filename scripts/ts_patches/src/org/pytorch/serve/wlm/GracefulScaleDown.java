/*
 * Graceful scale-down for TorchServe 0.12's frontend (our code, woven in by tspatches.Agent).
 *
 * Upstream WorkerThread.shutdown() closes the backend channel and interrupts the worker thread at
 * once, so the batch a removed worker is running is lost: its requests get 500 "Worker died." /
 * "Worker scaled down." or no answer, and BatchAggregator.sendError can race the worker thread
 * on the jobs map (500 ConcurrentModificationException to the scale call).
 *
 * With the agent, shutdown() first calls drain(): the worker is told to take no new batch (its
 * next BatchAggregator.getRequest parks until the interrupt), and shutdown waits until it has
 * answered the batch in flight, at most responseTimeout seconds. A worker that is idle inside
 * getRequest (no job taken, none waiting in the model's queue) is shut down at once, as before.
 * Should a job reach it between that check and the interrupt, the interrupted getRequest puts
 * the jobs it had taken back at the head of the model's queue for the other workers (upstream
 * clears them without an answer).
 *
 * Lives in org.pytorch.serve.wlm to read WorkerThread's protected fields (same runtime package:
 * both are loaded by the application class loader).
 */
package org.pytorch.serve.wlm;

import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.TimeUnit;
import org.pytorch.serve.util.messages.BaseModelRequest;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

public final class GracefulScaleDown {
    private static final Logger logger = LoggerFactory.getLogger(GracefulScaleDown.class);
    private static final Map<String, Flags> FLAGS = new ConcurrentHashMap<>();

    private static final class Flags {
        volatile boolean draining;
        volatile boolean parked;
        volatile boolean inGetRequest;
    }

    private GracefulScaleDown() {}

    private static Flags flags(String workerId) {
        return FLAGS.computeIfAbsent(workerId, k -> new Flags());
    }

    /**
     * Replaces WorkerThread.run's call of aggregator.getRequest(workerId, state); also tells
     * IdleDispatch the batch taken.
     */
    public static BaseModelRequest getRequest(
            BatchAggregator aggregator, String workerId, WorkerState state)
            throws InterruptedException, java.util.concurrent.ExecutionException {
        Flags f = flags(workerId);
        if (f.draining) {
            f.parked = true;
            while (true) { // until shutdown() interrupts this thread
                TimeUnit.SECONDS.sleep(3600);
            }
        }
        f.inGetRequest = true;
        try {
            BaseModelRequest request = aggregator.getRequest(workerId, state);
            IdleDispatch.dispatched(aggregator.model, aggregator.jobs.values());
            return request;
        } catch (InterruptedException e) {
            if (f.draining) {
                requeue(aggregator, workerId);
            }
            throw e;
        } finally {
            f.inGetRequest = false;
        }
    }

    private static void requeue(BatchAggregator aggregator, String workerId) {
        int n = 0;
        for (org.pytorch.serve.job.Job job : aggregator.jobs.values()) {
            aggregator.model.addFirst(job);
            n++;
        }
        aggregator.jobs.clear();
        if (n > 0) {
            logger.info("{} was scaled down while collecting a batch: {} job(s) requeued", workerId, n);
        }
    }

    /** Called first thing in WorkerThread.shutdown(). */
    public static void drain(WorkerThread worker) {
        String id = worker.getWorkerId();
        Flags f = flags(id);
        f.draining = true;
        long start = System.nanoTime();
        long deadline = start + TimeUnit.SECONDS.toNanos(Math.max(worker.responseTimeout, 1));
        try {
            while (System.nanoTime() < deadline) {
                if (f.parked || worker.getState() != WorkerState.WORKER_MODEL_LOADED) {
                    break; // answered its last batch, or not serving at all
                }
                if (f.inGetRequest && worker.req == null && worker.aggregator.jobs.isEmpty()
                        && worker.model.getPendingRequestsInJobQueue() == 0) {
                    break; // idle: no job taken and none waiting
                }
                TimeUnit.MILLISECONDS.sleep(1);
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        } finally {
            FLAGS.remove(id);
        }
        logger.info("drained {} before scale-down in {} ms (parked: {})", id,
                TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - start), f.parked);
    }
}
