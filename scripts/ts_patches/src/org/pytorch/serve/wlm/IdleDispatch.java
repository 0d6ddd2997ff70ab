/*
 * Idle dispatch for TorchServe 0.12's dynamic batching (our code, woven in by tspatches.Agent).
 *
 * Upstream Model.pollBatch takes the first job, then waits up to maxBatchDelay ms for more.
 * When requests come one at a time (a single client, or traffic sparse enough that requests
 * never overlap) nothing else can arrive, so every request pays the full maxBatchDelay for a
 * batch of one.
 *
 * With the agent, pollBatch reads its delay from maxBatchDelay(model) instead of the field:
 *   - the model's last batch held one job (or none was dispatched yet) and at most one job
 *     is waiting: 0 ms, so the first job goes out with whatever is already queued
 *     (upstream's loop takes at most one more at 0 ms). "At most one", not "none": the read
 *     happens when the worker comes back for its next batch, and a client that sends its
 *     next request as soon as it reads the previous answer is often quicker than that;
 *   - otherwise (the last batch had several jobs, or two or more are queued):
 *     maxBatchDelay, as upstream. A burst after an idle spell therefore costs one short batch, after which the
 *     queue is non-empty and batching resumes.
 * Under load (batches of two or more) nothing changes. Turned off by setting the environment
 * variable TS_IDLE_DISPATCH=0 for the frontend.
 */
package org.pytorch.serve.wlm;

import java.util.Collections;
import java.util.Map;
import java.util.WeakHashMap;

public final class IdleDispatch {
    static final boolean ENABLED = !"0".equals(System.getenv("TS_IDLE_DISPATCH"));
    /** Jobs in the last batch each model dispatched (weak keys: unregistered models go). */
    private static final Map<Model, Integer> LAST_BATCH =
            Collections.synchronizedMap(new WeakHashMap<>());

    private IdleDispatch() {}

    /** Replaces pollBatch's read of Model.maxBatchDelay (ms). */
    public static int maxBatchDelay(Model model) {
        int configured = model.getMaxBatchDelay();
        if (!ENABLED) {
            return configured;
        }
        Integer last = LAST_BATCH.get(model);
        boolean idle = (last == null || last <= 1) && model.getPendingRequestsInJobQueue() <= 1;
        return idle ? 0 : configured;
    }

    /** Records the size of the batch a worker of model just took. */
    static void dispatched(Model model, int jobs) {
        if (ENABLED && jobs > 0) {
            LAST_BATCH.put(model, jobs);
        }
    }
}
